"""Studies built from measurements: the layer-placement study (`lacq demo`)."""

"""The results database, every table built from it, their rendering and plots."""

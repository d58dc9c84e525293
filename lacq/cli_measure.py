"""Measurement commands beyond perplexity (niah, kld, bench), registered on lacq's CLI group."""

"""easelbot engine: the GPU side. Only this package imports torch and diffusers (protocol, errors and config do not)."""

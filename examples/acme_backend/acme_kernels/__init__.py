"""acme-kernels: an example third-party Switchyard backend."""
__version__ = "0.3.0"

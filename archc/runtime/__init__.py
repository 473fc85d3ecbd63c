"""What generated modules call at run time: layers, routers, mixers, decoding. Imports only torch and archc.kernels."""

"""Identity without grpc: the CA (``pki``) and who may connect (``registry``)."""

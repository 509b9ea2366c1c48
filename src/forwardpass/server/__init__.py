"""The HTTP server: Open Inference Protocol V2, a human predict endpoint, metrics (needs forwardpass[server])."""

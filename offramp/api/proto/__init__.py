"""Generated gRPC modules of ``offramp.proto`` (package ``offramp.v1``); see ``generate.sh``."""

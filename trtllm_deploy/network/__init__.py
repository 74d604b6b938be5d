"""The fabric between the nodes (ConnectX-7 on a Spark): what is cabled to what, the addresses
and MTU each link gets, applied the node's own way and written into hosts.toml (``fabric.setup``).
"""

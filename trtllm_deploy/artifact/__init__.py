"""The artifact layer: models, the fit check, the Hub, building and quantizing, the manifest,
verifying a copy on a node."""

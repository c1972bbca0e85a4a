"""KV-cache policies: one dataclass per file, configured by ``configs/policy/<name>.yaml``."""

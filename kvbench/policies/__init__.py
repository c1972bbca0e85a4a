"""KV-cache policies: one dataclass per file, configured by ``kvbench/configs/policy/<name>.yaml``."""

"""The base model: where it comes from (``sources``, the demo model included), loading it in 4-bit
NF4 (``base``), LoRA adapters on it (``lora``), its fingerprint (``fingerprint``) and tiny models
built in code for tests and benchmarks (``tiny``)."""

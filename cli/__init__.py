"""The `lora-fusion` command line, installed as the `lora_fusion_cli` package."""

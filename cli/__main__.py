"""`python -m lora_fusion_cli …` (and `accelerate launch -m lora_fusion_cli …`) runs the `lora-fusion` CLI."""

import sys

from lora_fusion_cli.main import main

sys.exit(main())

import sys

from megatron_patch.cli import main

sys.exit(main())

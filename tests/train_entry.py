"""`vtok` with the test tasks registered: python tests/train_entry.py train RECIPE ... (or under torchrun)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_tasks  # noqa: E402,F401  (registers tiny-ae and tiny-gan)
from vtok.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

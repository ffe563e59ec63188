import sys

from isynth.cli import main

sys.exit(main())

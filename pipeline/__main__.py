import sys

from .stages import main

sys.exit(main())

import sys
from dario_lib.cli import main
sys.exit(main())

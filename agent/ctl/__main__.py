import sys

from agent.ctl.app import main

sys.exit(main())

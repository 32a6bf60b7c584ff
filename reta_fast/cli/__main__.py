"""``python -m reta_fast.cli ...`` (what ``torchrun -m reta_fast.cli`` runs): the ``reta`` command."""
import sys

from . import main

sys.exit(main())

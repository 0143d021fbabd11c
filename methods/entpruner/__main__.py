"""python -m methods.entpruner <decision log or run folder> ...: "adaptive decisions: k of n" per run
(methods.entpruner.schedule.main)."""
import sys

from methods.entpruner.schedule import main

sys.exit(main())

"""Exit codes of every command: public API, deploy hooks branch on them."""

OK = 0          # done, valid, ready, PASS
FAILED = 1      # could not do the job; nothing changed unless reported
USAGE = 2       # argparse usage error
NO = 3          # ran correctly, the answer is "no" (not ready, diff, FAIL)
FOLLOW_UP = 4   # main action done, a follow-up (restart, post-verify) failed

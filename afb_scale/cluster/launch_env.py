"""Constants shared by the trainer and the launch scripts (launch/torchrun.sh, launch/slurm/).

The shell scripts carry the same values as literals next to a comment naming this module; a test
(tests/test_submit.py) checks that they agree.
"""

# Exit status of a trainer that received the preemption signal (SIGUSR1, or SIGTERM), finished its
# step and saved a checkpoint: "temporary failure, run me again" (EX_TEMPFAIL in sysexits.h).
# The Slurm batch script requeues the job when its training step ends with this status.
REQUEUE_EXIT_CODE = 75

# The signal the Slurm scripts use for "checkpoint and exit for requeue" (`--signal=B:USR1@N`).
PREEMPT_SIGNAL = "SIGUSR1"


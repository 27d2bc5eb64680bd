"""Tools that span the stages, above them all: ``ldm-bench`` (it exports a checkpoint and times every engine),
``ldm-eval`` (it samples a model and judges it with the attribute classifier that ``ldm_train`` trains),
``ldm-sheet`` (ldm-sample runs side by side) and the harness that runs ``ldm-serve`` in a child process. They may
import any package; no package imports them.
"""

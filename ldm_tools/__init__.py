"""Tools that span the stages, above them all: ``ldm-bench`` (it exports a checkpoint and times every engine) and
``ldm-eval`` (it samples a model and judges it with the attribute classifier that ``ldm_train`` trains). They may
import any package; no package imports them."""

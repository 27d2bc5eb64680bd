"""The library every stage uses: the model configuration and the networks (``models``), checkpoint and engine-dir
reading, the noise schedule and DDIM, the engines, the text-to-image pipeline and ``ldm-sample``.

It imports no stage (``ldm_train``, ``ldm_export``, ``ldm_serve``) and no tool (``ldm_tools``). torch is imported
only by the modules that run a network (``models``, the torch and triton engines): an engine dir is served without it.
"""

"""The thin runtime: noise schedules and DDIM, engines, the text-to-image pipeline."""

"""ccurate: Creative-Commons image-text datasets for latent diffusion."""

import os as _os

__version__ = "0.1.0"

# Libraries ccurate loads report usage home by default: onnxruntime (NudeNet, RapidOCR) looks up
# mobile.events.data.microsoft.com from every worker ~9 s after its first model loads and keeps
# a device id and an event store under ~/.cache/Microsoft; Ray and the Hugging Face hub have
# their own. A data node sends nothing but its crawl, so they are off unless the user set them:
# set here, at the package's import, they reach the CLI, library users and every worker
# (spawned, Ray, Slurm) before any of those libraries starts.
TELEMETRY_OFF = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _name, _value in TELEMETRY_OFF.items():
    _os.environ.setdefault(_name, _value)

"""onnxruntime: the one session factory, probes that expose intermediates, latency, the CPU it runs on."""

from optcc.runtime.cpu import CpuFeatures, this_cpu
from optcc.runtime.latency import median_seconds
from optcc.runtime.providers import provider_entry
from optcc.runtime.session import (REFUSALS, RefusedModel, building_session, detached, first_line, make_session, resolve_providers, run,
                                   session_options, with_outputs)

__all__ = ["CpuFeatures", "this_cpu", "median_seconds", "detached", "first_line", "make_session", "provider_entry",
           "REFUSALS", "RefusedModel", "building_session", "resolve_providers", "run", "session_options", "with_outputs"]

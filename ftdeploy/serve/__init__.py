"""``ftdeploy serve``: one ONNX file, or a model repository of several models with versions, over HTTP
(FastAPI on uvicorn): ``/v1``, this project's own API, and ``/v2``, the Open Inference Protocol that
Triton's, KServe's and OpenVINO Model Server's clients speak. Torch-free: installs with
``pip install 'ftdeploy[serve]'``.

- :mod:`.app`: the app (routes of ``/v1``, errors, metrics, docs);
- :mod:`.protocol`: the Open Inference Protocol (``/v2``);
- :mod:`.repository`: what is served (a file, or ``REPO/<model>/<version>/``), versions and their policy;
- :mod:`.handling`: what every prediction route does (bodies and their limits, decoding off the loop);
- :mod:`.batching`: micro-batching, its queue and statistics;
- :mod:`.providers`: onnxruntime's execution provider for a file;
- :mod:`.process`: processes, workers, signals and the drain.
"""

from ..errors import DependencyError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import swagger_ui_bundle  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:  # pragma: no cover - exercised by users without the extra
    raise DependencyError("serving needs FastAPI, uvicorn, prometheus-client and swagger-ui-bundle-v2",
                          "pip install 'ftdeploy[serve]'") from None

from ..codecs import Limits
from .app import Metrics, create_app, intra_op_threads
from .batching import Lifecycle, MicroBatcher, Stats
from .process import DrainingServer, ServeOptions, block_new_connections, serve, take_queued_connections
from .providers import check_agreement, choose_provider
from .repository import Repository, VersionPolicy

__all__ = ["DrainingServer", "Lifecycle", "Limits", "Metrics", "MicroBatcher", "Repository", "ServeOptions", "Stats",
           "VersionPolicy", "block_new_connections", "check_agreement", "choose_provider", "create_app",
           "intra_op_threads", "serve", "take_queued_connections"]

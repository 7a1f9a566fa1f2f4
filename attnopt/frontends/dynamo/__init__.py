"""The Dynamo front end: ``torch.compile(model, backend="attnopt")`` and the capture behind
``attnopt.optimize`` for models that carry caches, changing ints or other argument sets."""

from attnopt.frontends.dynamo.backend import attnopt_backend

__all__ = ["attnopt_backend"]

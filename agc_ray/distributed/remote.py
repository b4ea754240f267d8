"""Ray remote functions created on first use, so that importing a module does not import Ray."""

from __future__ import annotations


class LazyRemote:
    """``LazyRemote(fn, **options)``: behaves like ``ray.remote(**options)(fn)``, built on first call."""

    def __init__(self, fn, **options):
        self.fn = fn
        self.options_ = options
        self._remote = None

    def _get(self):
        if self._remote is None:
            import ray

            self._remote = ray.remote(**self.options_)(self.fn) if self.options_ else ray.remote(self.fn)
        return self._remote

    def options(self, **kwargs):
        return self._get().options(**kwargs)

    def remote(self, *args, **kwargs):
        return self._get().remote(*args, **kwargs)


def lazy_remote(fn=None, **options):
    """Decorator or function: a :class:`LazyRemote` of ``fn`` with Ray ``options``."""
    if fn is None:
        return lambda f: LazyRemote(f, **options)
    return LazyRemote(fn, **options)

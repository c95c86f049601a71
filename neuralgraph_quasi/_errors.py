"""Exceptions raised by :mod:`neuralgraph_quasi`."""

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """A network, graph or checkpoint that cannot be converted.

    Raised by :func:`~neuralgraph_quasi.to_graph` for modules or values the
    graph cannot represent exactly, and by :func:`~neuralgraph_quasi.to_model`
    when the template module does not match the graph. The message names the
    offending module path, parameter or key.
    """

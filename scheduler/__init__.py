"""The p2pdist scheduler: the swarm's picture and its decisions (issue 3).

Nothing lives here yet; the node runs standalone, straight from the registry.
"""

__all__: list[str] = []

"""Feature families in the browser: the panel on a feature page (panel), the family page's graph
and what children fire on that their parents do not (graph, splits), and the feature map (map)."""

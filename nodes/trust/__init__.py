"""Trust: who is calling (authentication), what they may change (permissions), what was done
(audit), how much they may ask (quotas), and the node's certificates.

Nothing here imports the domain (``nodes.authority``, ``nodes.registry``): what a trust module
needs from it is handed in as plain callables and data.
"""

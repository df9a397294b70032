"""Optional integrations of attnreg with other libraries.

Each sub-package imports its library only when it is imported itself (``import attnreg`` never
does), and raises an ``ImportError`` naming the pip extra to install when the library is absent.
"""

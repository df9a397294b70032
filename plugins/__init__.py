"""Built-in attention variants. Each sub-package is an ordinary pluggy plugin, found through the
``attnreg`` entry-point group exactly like a third-party plugin; nothing imports them by name."""

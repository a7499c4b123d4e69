"""See ../shared/DESIGN.md for the layout."""

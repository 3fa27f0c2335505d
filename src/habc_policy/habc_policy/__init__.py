"""Robot-side nodes and policy models of habc."""

"""The habc labelling dashboard: an rqt plugin, also runnable standalone."""

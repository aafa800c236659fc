"""Board and link profiles, the update agent, and constrained-link measurement."""

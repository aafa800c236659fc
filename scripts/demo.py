"""End-to-end demo (grows with each capability): see README."""

"""The site's side of each head solver (server/solvers/ has the server's): plain functions, no Flower."""

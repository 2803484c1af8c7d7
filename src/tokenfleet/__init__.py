"""Fleet-wide OAuth2 client-credentials tokens, shared through Redis."""

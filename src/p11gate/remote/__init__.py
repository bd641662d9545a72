"""Remote access: the gateway's TLS listener, and the client side (`p11gate tunnel`,
`p11gate agent`) that carries a stock p11-kit client's RPC stream over TLS."""

"""The site side of fedseg: ClientApp, site state, site data and the site daemon."""

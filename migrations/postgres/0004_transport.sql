-- Which device link a session uses (`quic` or `tcp`), kept with presence so that every
-- relay of a cluster can show it.
ALTER TABLE presence ADD COLUMN transport TEXT;

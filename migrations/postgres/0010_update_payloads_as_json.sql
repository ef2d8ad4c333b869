-- An update's data and notification are stored as the text the node wrote (`json`), not parsed
-- into `jsonb`: nothing queries inside them, they are only read back whole.
ALTER TABLE updates ALTER COLUMN data TYPE json USING data::json,
    ALTER COLUMN notification TYPE json USING notification::json;

"""Unit tests of proxy.classify: statement classes, the sqlglot traps of notes/measured.md,
the digest cache (literal-dependent statements, LRU bound), the fast path against the full
path, and robustness on garbage and huge statements."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from proxy.routing import classify as C
from proxy.routing.classify import F_STORED_CALL, READ, SESSION, WRITE, Classification, Classifier, flag_names

RO_FUNCS = ["my_ro", "db2.ro_qualified"]


def F(spec: str = "") -> int:
    """Flags from 'BEGIN|READ_ONLY_TXN' (names without the F_ prefix)."""
    out = 0
    for name in filter(None, spec.split("|")):
        out |= getattr(C, "F_" + name)
    return out


R, W, S = READ, WRITE, SESSION

# (statement, route, flags)
CORPUS = [
    # --- plain reads
    ("SELECT c FROM sbtest1 WHERE id=5000", R, ""),
    ("select * from t where a in (1,2,3) and b='x'", R, ""),
    ("SELECT 1", R, ""),
    ("SELECT 1;", R, ""),
    ("SELECT * FROM t1 JOIN t2 USING (id)", R, ""),
    ("SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))", R, ""),
    ("SELECT 1 UNION SELECT 2", R, ""),
    ("(SELECT 1) UNION (SELECT 2)", R, ""),
    ("SELECT (SELECT MAX(a) FROM u) FROM t", R, ""),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id)", R, ""),
    ("WITH a AS (SELECT 1) SELECT * FROM a", R, ""),
    ("WITH RECURSIVE c (n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n < 5) SELECT * FROM c", R, ""),
    ("SELECT * FROM (SELECT a FROM t) AS d (x)", R, ""),
    ("SELECT COUNT(*), SUM(k), MD5(c), SHA2(c, 256) FROM t", R, ""),
    ("SELECT CAST(a AS DECIMAL(10,2)), CONVERT(b, CHAR(10)), CONVERT(c USING utf8mb4) FROM t", R, ""),
    ("SELECT * FROM JSON_TABLE('[]', '$[*]' COLUMNS (a INT PATH '$')) AS jt", R, ""),
    ("SELECT * FROM t PARTITION (p0) FORCE INDEX (i) WHERE a = 1", R, ""),
    ("SELECT * FROM t USE INDEX (i)", R, ""),
    ("SELECT doc->'$.a', doc->>'$.b', JSON_EXTRACT(doc, '$.c') FROM t", R, ""),
    ("SELECT IF(a, 1, 2), CASE WHEN a THEN 1 END, IFNULL(a, 0), COALESCE(a, b) FROM t", R, ""),
    ("SELECT ROW_NUMBER() OVER w FROM t WINDOW w AS (ORDER BY a)", R, ""),
    ("SELECT LAST_VALUE(a) OVER (ORDER BY b) FROM t", R, ""),
    ("SELECT a FROM t GROUP BY a WITH ROLLUP", R, ""),
    ("SELECT * FROM t WHERE a LIKE 'x%' ESCAPE '!'", R, ""),
    ("SELECT CURRENT_TIMESTAMP, NOW(), CURDATE(), UUID(), RAND(), SLEEP(0), BENCHMARK(1, 1)", R, ""),
    ("SELECT DATE_ADD(NOW(), INTERVAL 1 DAY), TIMESTAMPDIFF(SECOND, a, b) FROM t", R, ""),
    ("SELECT GROUP_CONCAT(DISTINCT a ORDER BY a SEPARATOR ';') FROM t", R, ""),
    ("SELECT * FROM t WHERE MATCH(a) AGAINST ('x' IN BOOLEAN MODE)", R, ""),
    ("SELECT REPLACE('a','b','c'), INSERT('abc',1,1,'x'), TRUNCATE(1.5, 0)", R, ""),
    ("select sql_calc_found_rows * from t limit 10", R, ""),
    ("SELECT HIGH_PRIORITY STRAIGHT_JOIN SQL_NO_CACHE a FROM t", R, ""),
    ("SELECT * FROM tëst WHERE näme = 'ü'", R, ""),
    ("SELECT 'a' 'b', x'41', b'01', _utf8mb4'x' COLLATE utf8mb4_bin, N'x'", R, ""),
    ("SELECT 1 AS `for update`, 'FOR UPDATE', `update`.a FROM `update`", R, ""),
    ("SELECT get_lock FROM t", R, ""),
    ("SELECT a FROM t WHERE b = ? LIMIT ?", R, ""),
    ("SELECT * FROM t FOR SYSTEM_TIME AS OF TIMESTAMP'2020-01-01 00:00:00'", R, ""),
    ("SELECT ST_AsText(ST_GeomFromText('POINT(1 1)'))", R, ""),
    ("SELECT @@server_id, @@port, @@global.read_only, @@session.sql_mode", R, ""),
    ("SELECT @x, @`y`", R, "USER_VAR_READ"),
    ("SELECT\t*\nFROM\r\nt", R, ""),
    ("TABLE t", R, ""),
    ("SELECT my_ro(a) FROM t", R, ""),
    ("SELECT `my_ro`(1)", R, ""),
    ("SELECT db2.ro_qualified(1)", R, ""),
    ("SELECT 5--3", R, ""),
    # --- reads with comments
    ("SELECT 1 /* FOR UPDATE */", R, ""),
    ("SELECT 1 -- FOR UPDATE", R, ""),
    ("SELECT 1 # FOR UPDATE", R, ""),
    ("/* app=x, traceparent='00-ab' */ SELECT 1", R, ""),
    # --- SHOW / DESCRIBE / EXPLAIN / HELP
    ("SHOW TABLES", R, ""),
    ("SHOW FULL PROCESSLIST", R, ""),
    ("SHOW CREATE TABLE t", R, ""),
    ("SHOW VARIABLES LIKE 'x'", R, ""),
    ("SHOW GLOBAL STATUS LIKE 'x'", R, ""),
    ("SHOW SLAVE STATUS", R, ""),
    ("SHOW GRANTS FOR CURRENT_USER()", R, ""),
    ("SHOW INDEX FROM t", R, ""),
    ("SHOW MASTER STATUS", W, ""),
    ("SHOW BINLOG STATUS", W, ""),
    ("SHOW BINARY LOGS", W, ""),
    ("SHOW MASTER LOGS", W, ""),
    ("SHOW BINLOG EVENTS IN 'x'", W, ""),
    ("SHOW SLAVE HOSTS", W, ""),
    ("SHOW REPLICA HOSTS", W, ""),
    ("SHOW WARNINGS", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW ERRORS", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW COUNT(*) WARNINGS", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW PROFILES", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW STATUS", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW SESSION STATUS LIKE 'Last%'", W, "CONN_BOUND|PREVIOUS"),
    ("SHOW EXPLAIN FOR 5", W, ""),
    ("DESCRIBE t", R, ""),
    ("DESC t a", R, ""),
    ("EXPLAIN t", R, ""),
    ("EXPLAIN SELECT 1", R, ""),
    ("EXPLAIN FORMAT=JSON SELECT * FROM t", R, ""),
    ("EXPLAIN EXTENDED SELECT * FROM t", R, ""),
    ("EXPLAIN ANALYZE SELECT * FROM t", R, ""),
    ("EXPLAIN UPDATE t SET a=1", W, ""),
    ("EXPLAIN SELECT * FROM t FOR UPDATE", W, ""),
    ("EXPLAIN FOR CONNECTION 5", W, ""),
    ("ANALYZE SELECT * FROM t", R, ""),
    ("ANALYZE FORMAT=JSON SELECT 1", R, ""),
    ("ANALYZE UPDATE t SET a = 1", W, ""),
    ("ANALYZE TABLE t", W, "IMPLICIT_COMMIT"),
    ("ANALYZE NO_WRITE_TO_BINLOG TABLE t", W, "IMPLICIT_COMMIT"),
    ("HELP 'select'", R, ""),
    ("HELP contents", R, ""),
    # --- SELECTs that must run on the primary
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", W, ""),
    ("select * from t for update", W, ""),
    ("SELECT * FROM t FOR UPDATE SKIP LOCKED", W, ""),
    ("SELECT * FROM t FOR UPDATE NOWAIT", W, ""),
    ("SELECT * FROM t FOR SHARE", W, ""),
    ("SELECT * FROM t WHERE a = 1 LOCK IN SHARE MODE", W, ""),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) x", W, ""),
    ("SELECT * FROM t1 WHERE a IN (SELECT b FROM t2 FOR UPDATE)", W, ""),
    ("(SELECT * FROM t) FOR UPDATE", W, ""),
    ("SELECT a FROM t UNION SELECT b FROM u FOR UPDATE", W, ""),
    ("SELECT a INTO @x FROM t", W, "USER_VAR_WRITE"),
    ("SELECT 1 INTO @a, @b", W, "USER_VAR_WRITE"),
    ("SELECT a FROM t INTO @x", W, "USER_VAR_WRITE|UNPARSED"),
    ("SELECT a INTO OUTFILE '/tmp/x' FROM t", W, "UNPARSED"),
    ("SELECT a FROM t INTO DUMPFILE '/tmp/x'", W, "UNPARSED"),
    ("SELECT @x := 1", W, "USER_VAR_WRITE"),
    ("SELECT @x := @x + 1 FROM t", W, "USER_VAR_WRITE|USER_VAR_READ"),
    ("SELECT GET_LOCK('a', 1)", W, "GET_LOCK"),
    ("SELECT IS_FREE_LOCK('a')", W, "GET_LOCK"),
    ("SELECT IS_USED_LOCK('a')", W, "GET_LOCK"),
    ("SELECT * FROM t WHERE id IN (SELECT GET_LOCK('a',1))", W, "GET_LOCK"),
    ("SELECT RELEASE_LOCK('a')", W, "RELEASE_LOCK"),
    ("SELECT RELEASE_ALL_LOCKS()", W, "RELEASE_LOCK"),
    ("SELECT LAST_INSERT_ID()", W, "CONN_BOUND"),
    # LAST_INSERT_ID(expr) sets the value: a SELECT's result does not carry it (the session keeps
    # its connection); an UPDATE's OK packet does (rwproxy keeps it and restores it)
    ("SELECT LAST_INSERT_ID(42)", W, "CONN_BOUND|CONN_STATE"),
    ("UPDATE seq SET id = LAST_INSERT_ID(id + 1)", W, "CONN_BOUND"),
    ("INSERT INTO t VALUES (NEXT VALUE FOR s)", W, "CONN_STATE"),
    ("HANDLER t CLOSE", W, ""),
    ("select last_insert_id()", W, "CONN_BOUND"),
    ("SELECT FOUND_ROWS()", W, "CONN_BOUND|PREVIOUS"),
    ("SELECT ROW_COUNT()", W, "CONN_BOUND|PREVIOUS"),
    ("SELECT CONNECTION_ID()", W, "CONN_BOUND"),
    ("SELECT LASTVAL(s)", W, "CONN_BOUND"),
    ("SELECT PREVIOUS VALUE FOR s", W, "CONN_BOUND|UNPARSED"),
    ("SELECT NEXTVAL(s)", W, "CONN_STATE"),
    ("SELECT SETVAL(s, 10)", W, "CONN_STATE"),
    ("SELECT NEXT VALUE FOR s", W, "UNPARSED|CONN_STATE"),
    ("SELECT MASTER_GTID_WAIT('0-1-1', 1)", W, ""),
    ("SELECT MASTER_POS_WAIT('f', 4)", W, ""),
    ("SELECT LOAD_FILE('/etc/passwd')", W, ""),
    ("SELECT @@warning_count", W, "CONN_BOUND|PREVIOUS"),
    ("SELECT @@session.error_count", W, "CONN_BOUND|PREVIOUS"),
    ("SELECT @@identity", W, "CONN_BOUND"),
    ("SELECT @@last_insert_id", W, "CONN_BOUND"),
    ("SELECT @@last_gtid", W, "CONN_BOUND"),
    ("SELECT my_func(a) FROM t", W, ""),
    ("SELECT `my_func`(1)", W, ""),
    ("SELECT db1.my_func(1)", W, ""),
    ("SELECT a.get_lock(1)", W, ""),
    ("SELECT date_diff(a, b)", W, ""),  # not a MariaDB built-in: a stored function
    # --- CTEs with writes
    ("WITH c AS (SELECT 1) UPDATE t SET a=1", W, ""),
    ("WITH a AS (SELECT 1) DELETE FROM t", W, ""),
    ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", W, ""),
    # --- DML and calls
    ("UPDATE sbtest1 SET k=k+1 WHERE id=5000", W, ""),
    ("DELETE FROM sbtest1 WHERE id=5000", W, ""),
    ("INSERT INTO sbtest1 (id, k, c, pad) VALUES (1, 2, 'a', 'b')", W, ""),
    ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a)", W, ""),
    ("INSERT INTO t VALUES (LAST_INSERT_ID())", W, "CONN_BOUND"),
    ("INSERT INTO t SELECT @x", W, "USER_VAR_READ"),
    ("REPLACE INTO t VALUES (1)", W, ""),
    ("UPDATE t SET a = 1 WHERE id IN (SELECT id FROM u)", W, ""),
    ("CALL p()", W, "CONN_STATE"),
    ("CALL p(@out)", W, "USER_VAR_WRITE|USER_VAR_READ|CONN_STATE"),
    ("DO 1", W, ""),
    ("DO SLEEP(1)", W, ""),
    ("DO GET_LOCK('a', 0)", W, "GET_LOCK"),
    ("DO RELEASE_LOCK('a')", W, "RELEASE_LOCK"),
    ("HANDLER t OPEN", W, "CONN_STATE"),
    ("HANDLER t READ FIRST", W, ""),
    ("KILL 5", W, "KILL"),
    ("KILL QUERY 5", W, "KILL"),
    ("KILL USER app", W, "KILL"),
    # --- DDL and admin
    ("CREATE TABLE t (a int)", W, "IMPLICIT_COMMIT"),
    ("CREATE VIEW v AS SELECT 1", W, "IMPLICIT_COMMIT"),
    ("ALTER TABLE t ADD COLUMN b int", W, "IMPLICIT_COMMIT"),
    ("DROP TABLE t", W, "IMPLICIT_COMMIT"),
    ("TRUNCATE TABLE t", W, "IMPLICIT_COMMIT"),
    ("RENAME TABLE a TO b", W, "IMPLICIT_COMMIT"),
    ("CREATE INDEX i ON t (a)", W, "IMPLICIT_COMMIT"),
    ("CREATE TEMPORARY TABLE tmp (a int)", W, "TEMP_TABLE"),
    ("CREATE OR REPLACE TEMPORARY TABLE tmp (a int)", W, "TEMP_TABLE"),
    ("DROP TEMPORARY TABLE IF EXISTS tmp", W, "TEMP_TABLE"),
    ("GRANT SELECT ON *.* TO u", W, "IMPLICIT_COMMIT"),
    ("REVOKE SELECT ON *.* FROM u", W, "IMPLICIT_COMMIT"),
    ("CREATE USER u IDENTIFIED BY 'x'", W, "IMPLICIT_COMMIT"),
    ("OPTIMIZE TABLE t", W, "IMPLICIT_COMMIT"),
    ("REPAIR TABLE t", W, "IMPLICIT_COMMIT"),
    ("CHECK TABLE t", W, "IMPLICIT_COMMIT"),
    ("CHECKSUM TABLE t", W, ""),
    ("FLUSH TABLES", W, "IMPLICIT_COMMIT"),
    ("FLUSH PRIVILEGES", W, "IMPLICIT_COMMIT"),
    ("FLUSH TABLES WITH READ LOCK", W, "IMPLICIT_COMMIT|LOCK_TABLES"),
    ("RESET QUERY CACHE", W, "IMPLICIT_COMMIT"),
    ("RESET MASTER", W, "IMPLICIT_COMMIT"),
    ("PURGE BINARY LOGS TO 'x'", W, ""),
    ("CHANGE MASTER TO MASTER_HOST='h'", W, "IMPLICIT_COMMIT"),
    ("START SLAVE", W, "IMPLICIT_COMMIT"),
    ("STOP REPLICA", W, "IMPLICIT_COMMIT"),
    ("INSTALL SONAME 'x'", W, "IMPLICIT_COMMIT"),
    ("LOAD INDEX INTO CACHE t", W, "IMPLICIT_COMMIT"),
    ("SHUTDOWN", W, ""),
    ("LOCK TABLES t READ", W, "LOCK_TABLES|IMPLICIT_COMMIT"),
    ("LOCK TABLE t WRITE, u READ", W, "LOCK_TABLES|IMPLICIT_COMMIT"),
    ("UNLOCK TABLES", W, "UNLOCK_TABLES"),
    ("LOAD DATA INFILE 'x' INTO TABLE t", W, "LOAD_DATA"),
    ("LOAD DATA LOCAL INFILE '/tmp/x' INTO TABLE t", W, "LOAD_DATA"),
    ("LOAD XML INFILE 'x' INTO TABLE t", W, "LOAD_DATA"),
    # --- transactions
    ("BEGIN", W, "BEGIN"),
    ("begin work", W, "BEGIN"),
    ("START TRANSACTION", W, "BEGIN"),
    ("START TRANSACTION READ WRITE", W, "BEGIN"),
    ("START TRANSACTION WITH CONSISTENT SNAPSHOT", W, "BEGIN"),
    ("START TRANSACTION READ ONLY", R, "BEGIN|READ_ONLY_TXN"),
    ("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY", R, "BEGIN|READ_ONLY_TXN"),
    ("START TRANSACTION READ ONLY, READ WRITE", W, "BEGIN"),
    ("START TRANSACTION READ SOMETIMES", W, "UNPARSED"),
    ("COMMIT", W, "COMMIT"),
    ("COMMIT WORK", W, "COMMIT"),
    ("COMMIT AND NO CHAIN NO RELEASE", W, "COMMIT"),
    ("COMMIT AND CHAIN", W, "COMMIT|BEGIN"),
    ("COMMIT RELEASE", W, "COMMIT|RELEASE_SESSION"),
    ("ROLLBACK", W, "ROLLBACK"),
    ("ROLLBACK WORK AND CHAIN", W, "ROLLBACK|BEGIN"),
    ("ROLLBACK TO SAVEPOINT sp1", W, ""),
    ("ROLLBACK WORK TO sp1", W, ""),
    ("SAVEPOINT sp1", W, ""),
    ("RELEASE SAVEPOINT sp1", W, ""),
    ("XA START 'x'", W, "XA|BEGIN"),
    ("XA BEGIN 'x'", W, "XA|BEGIN"),
    ("XA END 'x'", W, "XA"),
    ("XA PREPARE 'x'", W, "XA"),
    ("XA COMMIT 'x'", W, "XA|COMMIT"),
    ("XA ROLLBACK 'x'", W, "XA|ROLLBACK"),
    ("XA RECOVER", W, "XA"),
    ("BEGIN NOT ATOMIC SELECT 1; END", W, "MULTI|UNPARSED"),
    # --- session state
    ("SET autocommit=0", S, "AUTOCOMMIT_OFF"),
    ("SET autocommit=1", S, "AUTOCOMMIT_ON"),
    ("set autocommit = OFF", S, "AUTOCOMMIT_OFF"),
    ("SET autocommit = ON", S, "AUTOCOMMIT_ON"),
    ("SET autocommit = true", S, "AUTOCOMMIT_ON"),
    ("SET autocommit='OFF'", S, "AUTOCOMMIT_OFF"),
    ("SET autocommit = DEFAULT", S, "AUTOCOMMIT_OFF"),
    ("SET @@autocommit := 1", S, "AUTOCOMMIT_ON"),
    ("SET @@session.autocommit = 0", S, "AUTOCOMMIT_OFF"),
    ("SET SESSION autocommit = 0", S, "AUTOCOMMIT_OFF"),
    ("SET LOCAL autocommit = 1", S, "AUTOCOMMIT_ON"),
    ("SET sql_mode='', autocommit=0", S, "AUTOCOMMIT_OFF"),
    ("SET GLOBAL autocommit = 0", W, "SET_GLOBAL"),
    ("SET sql_mode='ANSI'", S, ""),
    ("SET x=1, y=2", S, ""),
    ("SET SESSION x = 1", S, ""),
    ("SET @@session.sql_mode = 'x'", S, ""),
    ("SET @@sql_mode = 'x'", S, ""),
    ("SET LOCAL x=1", S, ""),
    ("SET sql_mode = CONCAT(@@sql_mode, ',ANSI')", S, ""),
    ("SET NAMES utf8mb4", S, ""),
    ("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_unicode_ci'", S, ""),
    ("SET CHARACTER SET utf8", S, ""),
    ("SET CHARSET utf8", S, ""),
    ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", S, ""),
    # no scope: the next transaction only; replayed on a new connection it would bind a later one
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", W, "NEXT_TRX"),
    ("SET TRANSACTION READ ONLY", W, "NEXT_TRX"),
    ("SET @@tx_read_only = 1", W, "NEXT_TRX"),
    ("SET @@session.tx_read_only = 1", S, ""),
    ("SET tx_isolation = 'READ-COMMITTED'", S, ""),
    ("SET @@transaction_isolation = 'READ-COMMITTED', sql_mode = ''", W, "NEXT_TRX|SET_UNREPLAYABLE"),
    # a value rwproxy cannot reproduce elsewhere: the session stays on the primary
    ("SET time_zone = @tz", W, "USER_VAR_READ|SET_UNREPLAYABLE"),
    ("SET NAMES @cs", W, "USER_VAR_READ|SET_UNREPLAYABLE"),
    ("SET ROLE r", S, ""),
    ("SET @a = 1", S, "USER_VAR_WRITE"),
    ("SET @a := -1.5", S, "USER_VAR_WRITE"),
    ("SET @a = 1, sql_mode = 'x'", S, "USER_VAR_WRITE"),
    ("SET @a = NOW()", W, "USER_VAR_WRITE"),
    ("SET @a = (SELECT MAX(id) FROM t)", W, "USER_VAR_WRITE"),
    ("SET @a = @b", W, "USER_VAR_WRITE|USER_VAR_READ"),
    ("SET @a = LAST_INSERT_ID()", W, "USER_VAR_WRITE|CONN_BOUND"),
    ("SET time_zone = my_tz()", W, "SET_UNREPLAYABLE"),
    ("SET GLOBAL max_connections = 10", W, "SET_GLOBAL"),
    ("SET @@global.x = 1", W, "SET_GLOBAL"),
    ("SET PERSIST x = 1", W, "SET_GLOBAL"),
    ("SET GLOBAL TRANSACTION ISOLATION LEVEL SERIALIZABLE", W, "SET_GLOBAL"),
    ("SET PASSWORD = PASSWORD('x')", W, "IMPLICIT_COMMIT"),
    ("SET DEFAULT ROLE r FOR u", W, "IMPLICIT_COMMIT"),
    ("SET STATEMENT max_statement_time=10 FOR SELECT * FROM t", R, ""),
    ("SET STATEMENT max_statement_time=10 FOR SELECT * FROM t FOR UPDATE", W, ""),
    ("SET STATEMENT x=1 FOR UPDATE t SET a=1", W, ""),
    ("SET", W, "UNPARSED"),
    ("USE db", S, "USE_DB"),
    ("USE", W, "UNPARSED"),
    ("USE a b", W, "UNPARSED"),
    # --- SQL-level prepared statements
    ("PREPARE s FROM 'SELECT 1'", W, "SQL_PS|CONN_STATE"),
    ("PREPARE s FROM @sql", W, "SQL_PS|USER_VAR_READ|CONN_STATE"),
    ("EXECUTE s", W, "SQL_PS"),
    ("EXECUTE s USING @a", W, "SQL_PS|USER_VAR_READ"),
    ("DEALLOCATE PREPARE s", W, "SQL_PS"),
    ("DROP PREPARE s", W, "SQL_PS"),
    ("EXECUTE IMMEDIATE 'SELECT 1'", W, ""),
    ("GET DIAGNOSTICS @n = NUMBER", W, "CONN_BOUND|PREVIOUS|USER_VAR_WRITE|DIAG_VARS"),
    # --- hints
    ("/* rwproxy:primary */ SELECT 1", R, "HINT_PRIMARY"),
    ("/*rwproxy:replica*/ SELECT 1", R, "HINT_REPLICA"),
    ("SELECT /* RWPROXY : Primary */ a FROM t", R, "HINT_PRIMARY"),
    ("SELECT a FROM t /* rwproxy:replica */", R, "HINT_REPLICA"),
    ("/* rwproxy:replica */ UPDATE t SET a=1", W, "HINT_REPLICA"),
    ("/* rwproxy:replica */ SELECT * FROM t FOR UPDATE", W, "HINT_REPLICA"),
    ("SELECT 1 -- rwproxy:primary", R, ""),
    ("SELECT '/* rwproxy:primary */'", R, ""),
    ("/* rwproxy:somewhere */ SELECT 1", R, ""),
    # --- executable comments are code
    ("SELECT * FROM t /*!50000 FOR UPDATE */", W, ""),
    ("SELECT * FROM t /*!FOR UPDATE*/", W, ""),
    ("SELECT * FROM t /*M!100100 FOR UPDATE */", W, ""),
    ("SELECT * FROM t /*M! LOCK IN SHARE MODE */", W, ""),
    ("/*!40101 SET NAMES utf8 */", S, ""),
    ("/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE */", W, "USER_VAR_WRITE"),
    ("SELECT /*!99999 GET_LOCK('a', 1), */ 1", W, "GET_LOCK"),
    ("/*M!100100 SELECT 1 */", R, ""),
    # --- multi-statements
    ("SELECT 1; SELECT 2", W, "MULTI"),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, "MULTI|BEGIN|COMMIT"),
    ("SET autocommit=0; SELECT 1", W, "MULTI|AUTOCOMMIT_OFF|MULTI_SESSION"),
    ("SELECT 1; -- trailing comment", R, ""),
    ("SELECT ';' ; ", R, ""),
    # --- garbage
    ("", W, "UNPARSED"),
    ("   ", W, "UNPARSED"),
    (";;;", W, "UNPARSED"),
    ("-- only a comment", W, "UNPARSED"),
    ("/* only a comment */", W, "UNPARSED"),
    ("garbage here", W, "UNPARSED"),
    ("SELEC 1", W, "UNPARSED"),
    ("SELECT FROM", W, "UNPARSED"),
    ("SELECT 'unterminated", W, "UNPARSED"),
    ("SELECT `unterminated", W, "UNPARSED"),
    ("SELECT 1 /* unterminated", W, "UNPARSED"),
    ("VALUES (1, 2)", W, "UNPARSED"),  # sqlglot cannot parse it: conservative
    ("BEGIN garbage", W, "UNPARSED"),
    ("COMMIT garbage", W, "UNPARSED"),
]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier(readonly_functions=RO_FUNCS)


def _check(c: Classification, route: int, flags: str, sql) -> None:
    assert (c.route, flag_names(c.flags)) == (route, flag_names(F(flags))), f"{sql!r} -> {c!r}"


@pytest.mark.parametrize("sql,route,flags", CORPUS, ids=[repr(x[0])[:60] for x in CORPUS])
def test_corpus(clf, sql, route, flags):
    _check(clf.classify(sql), route, flags, sql)
    _check(clf.classify(sql.encode()), route, flags, sql)
    _check(clf.full_classify(sql), route, flags, sql)


# Every trap of notes/measured.md ("Classification traps found in sqlglot (mysql dialect)").
TRAPS = {
    "generic Command: CALL": ("CALL p(1)", W, "CONN_STATE"),
    "generic Command: REPLACE": ("REPLACE INTO t SET a = 1", W, ""),
    "generic Command: LOCK TABLES": ("LOCK TABLES t WRITE", W, "LOCK_TABLES|IMPLICIT_COMMIT"),
    "generic Command: UNLOCK TABLES": ("UNLOCK TABLES", W, "UNLOCK_TABLES"),
    "generic Command: GRANT": ("GRANT ALL ON db.* TO 'u'@'%'", W, "IMPLICIT_COMMIT"),
    "account names are not variables": ("CREATE DEFINER=`u`@`%` VIEW v AS SELECT @x", W,
                                        "IMPLICIT_COMMIT|USER_VAR_READ"),
    "generic Command: RENAME": ("RENAME TABLE a TO b", W, "IMPLICIT_COMMIT"),
    "generic Command: OPTIMIZE": ("OPTIMIZE TABLE t", W, "IMPLICIT_COMMIT"),
    "generic Command: PREPARE": ("PREPARE st FROM 'SELECT 1'", W, "SQL_PS|CONN_STATE"),
    "generic Command: EXECUTE": ("EXECUTE st", W, "SQL_PS"),
    "ParseError: XA": ("XA START 'xid1'", W, "XA|BEGIN"),
    "ParseError: HANDLER": ("HANDLER t OPEN AS h", W, "CONN_STATE"),
    "ParseError: LOAD DATA": ("LOAD DATA INFILE '/tmp/x' INTO TABLE t", W, "LOAD_DATA"),
    "ParseError: DO": ("DO 1 + 1", W, ""),
    "ParseError: FLUSH": ("FLUSH LOGS", W, "IMPLICIT_COMMIT"),
    "ParseError: DEALLOCATE": ("DEALLOCATE PREPARE st", W, "SQL_PS"),
    "ParseError: RELEASE SAVEPOINT": ("RELEASE SAVEPOINT sp1", W, ""),
    "ParseError: CHECKSUM": ("CHECKSUM TABLE t EXTENDED", W, ""),
    "ParseError: RESET": ("RESET SLAVE", W, "IMPLICIT_COMMIT"),
    "ParseError: START TRANSACTION WITH CONSISTENT SNAPSHOT":
        ("START TRANSACTION WITH CONSISTENT SNAPSHOT", W, "BEGIN"),
    "ParseError: SELECT INTO OUTFILE": ("SELECT * FROM t INTO OUTFILE '/tmp/o'", W, "UNPARSED"),
    "Alias: SAVEPOINT": ("SAVEPOINT sp1", W, ""),
    "Alias: HELP": ("HELP 'x'", R, ""),
    "IGNORE drops INTO OUTFILE": ("SELECT a INTO OUTFILE '/tmp/o' FROM t", W, "UNPARSED"),
    "IGNORE makes XA START an Alias": ("XA START 'x'", W, "XA|BEGIN"),
    "multi-statement is a Block": ("UPDATE t SET a = 1; SELECT 1", W, "MULTI"),
    "lock in a subquery": ("SELECT * FROM (SELECT * FROM t LOCK IN SHARE MODE) d", W, ""),
    "(SELECT ...) FOR UPDATE is a Subquery": ("(SELECT a FROM t WHERE id = 1) FOR UPDATE", W, ""),
    "GET_LOCK as Anonymous": ("SELECT GET_LOCK('k', 10)", W, "GET_LOCK"),
    "RELEASE_LOCK as Anonymous": ("SELECT RELEASE_LOCK('k')", W, "RELEASE_LOCK"),
    "LAST_INSERT_ID as Anonymous": ("SELECT LAST_INSERT_ID()", W, "CONN_BOUND"),
    "FOUND_ROWS as Anonymous": ("SELECT FOUND_ROWS()", W, "CONN_BOUND|PREVIOUS"),
    "ROW_COUNT as Anonymous": ("SELECT ROW_COUNT()", W, "CONN_BOUND|PREVIOUS"),
    "user function as Anonymous": ("SELECT app_udf(id) FROM t", W, ""),
    "INTO @v only in args['into']": ("SELECT a INTO @v FROM t LIMIT 1", W, "USER_VAR_WRITE"),
    "executable comment dropped": ("SELECT * FROM t WHERE id = 1 /*!50000 FOR UPDATE */", W, ""),
    "MariaDB executable comment": ("SELECT * FROM t /*M!100000 FOR UPDATE */", W, ""),
    "first-keyword regex: WITH ... UPDATE": ("WITH x AS (SELECT 1) UPDATE t SET a = 2", W, ""),
}


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_measured_traps(clf, trap):
    sql, route, flags = TRAPS[trap]
    _check(clf.classify(sql), route, flags, sql)


def test_autocommit_literal_through_cache():
    """SET autocommit=0 and =1 share a literal-stripped digest: neither may be answered from
    the other's cache entry (spellings outside the exact-text table, so the cache is used)."""
    c = Classifier()
    for _ in range(3):
        for text, flag in [("SET  autocommit = 0", C.F_AUTOCOMMIT_OFF),
                           ("SET  autocommit = 1", C.F_AUTOCOMMIT_ON),
                           ("set @@autocommit=0 ", C.F_AUTOCOMMIT_OFF),
                           ("set @@autocommit=1 ", C.F_AUTOCOMMIT_ON),
                           ("SET sql_mode='', autocommit=0", C.F_AUTOCOMMIT_OFF),
                           ("SET sql_mode='', autocommit=1", C.F_AUTOCOMMIT_ON)]:
            got = c.classify(text)
            assert got.flags & (C.F_AUTOCOMMIT_ON | C.F_AUTOCOMMIT_OFF) == flag, (text, got)
    assert c.cache_info()["size"] == 0


@pytest.mark.parametrize("sql, value", [
    ("SET wait_timeout=1", "1"), ("set session wait_timeout = 5", "5"), ("SET LOCAL wait_timeout=6", "6"),
    ("SET @@wait_timeout=7", "7"), ("SET @@session.wait_timeout = 8, autocommit=1", "8"),
    ("SET @@local.wait_timeout=9", "9"), ("SET wait_timeout=DEFAULT", "DEFAULT"), ("SET wait_timeout = 60*2", "60*2"),
    ("SET @a='wait_timeout=5', wait_timeout=3", "3"), ("SET wait_timeout=1, wait_timeout=4", "4"),
    ("SET GLOBAL sql_mode='', SESSION wait_timeout=2", "2"), ("/*!40101 SET wait_timeout=11 */", "11"),
    ("SET NAMES utf8mb4; SET wait_timeout=12", "12"),
    # not the session's: another scope, a one-statement SET, or another variable
    ("SET GLOBAL wait_timeout=9", None), ("SET @@global.wait_timeout=9", None), ("SET net_wait_timeout=1", None),
    ("SET STATEMENT wait_timeout=1 FOR SELECT 1", None), ("SELECT 'SET wait_timeout=1'", None),
    ("SET @wait_timeout=1", None),
])
def test_session_wait_timeout_is_flagged_and_its_value_read_from_the_text(sql, value):
    """SET [SESSION] wait_timeout (the session closes after that many idle seconds, frontend/idle.py):
    the flag comes from the classification, cached or not (the cache keeps no literal), and the
    value from the text, the last assignment winning as on the server."""
    c = Classifier()
    for _ in range(2):  # (the second time from the cache)
        assert bool(c.classify(sql).flags & C.F_WAIT_TIMEOUT) == (value is not None), sql
    assert C.session_value(sql.encode(), "wait_timeout") == value


@pytest.mark.parametrize("sql, rest", [
    # Connector/J's connection set-up (2.7, with sessionVariables)
    ("set autocommit=1, sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES'),sql_mode='PIPES_AS_CONCAT'",
     "SET sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES'), sql_mode='PIPES_AS_CONCAT'"),
    ("SET SESSION autocommit=0, sql_mode=''", "SET sql_mode=''"),
    ("SET @@session.autocommit=1, LOCAL wait_timeout=5, @x=1", "SET LOCAL wait_timeout=5, @x=1"),
    ("SET autocommit = 1, NAMES utf8mb4 COLLATE utf8mb4_bin", "SET NAMES utf8mb4 COLLATE utf8mb4_bin"),
    ("SET /* a, b */ autocommit=1, time_zone='+00:00'", "SET time_zone='+00:00'"),
    ("SET autocommit=1, autocommit=0", ""),
    # not one plain SET: kept on the primary
    ("SET autocommit=1; SET sql_mode=''", None), ("SET autocommit=1, sql_mode='", None),
])
def test_a_set_of_autocommit_among_other_variables_is_replayed_without_it(sql, rest):
    """Replicas keep autocommit on; the other variables of the same SET must still reach them."""
    assert C.replayable_part(sql.encode(), "autocommit") == (None if rest is None else rest.encode())


def test_drop_database_names_the_dropped_database_and_is_no_use():
    """DROP DATABASE/SCHEMA carries the dropped name (the session may lose its current database,
    frontend/commands.py); in a multi-statement only USE sets the database the session moves to."""
    c = Classifier()
    for sql, name in [("DROP DATABASE db1", "db1"), ("drop schema if exists `My db`", "My db"),
                      ("DROP DATABASE IF EXISTS x", "x")]:
        got = c.classify(sql)
        assert got.flags & C.F_DROP_DB and not got.flags & C.F_USE_DB and got.db == name, sql
    assert not c.classify("DROP TABLE t").flags & C.F_DROP_DB
    multi = c.classify("USE a; DROP DATABASE b")
    assert multi.db == "a" and multi.parts[1].db == "b" and multi.flags & C.F_DROP_DB
    assert c.classify("DROP DATABASE b; SELECT 1").db is None
    assert c.cache_info()["size"] == 0 or all(c.classify(f"DROP DATABASE d{i}").db == f"d{i}" for i in range(3))


def test_use_db_keeps_its_name_and_is_not_cached():
    c = Classifier()
    assert c.classify("USE a").db == "a"
    assert c.classify("USE b").db == "b"
    assert c.classify("USE MyDb").db == "MyDb"
    assert c.classify("use `my db`").db == "my db"
    assert c.classify("USE `odd``name`;").db == "odd`name"
    multi = c.classify("USE a; SELECT 1")
    assert multi.db == "a" and multi.flags & C.F_MULTI and multi.flags & C.F_USE_DB
    assert c.cache_info()["size"] == 0


def test_multi_statement_parts_in_order():
    c = Classifier()
    m = c.classify("BEGIN; UPDATE t SET a = 1; SELECT 1; COMMIT")
    assert m.route == WRITE and m.flags & C.F_MULTI
    assert [(p.route, p.flags) for p in m.parts] == [
        (WRITE, C.F_BEGIN), (WRITE, 0), (READ, 0), (WRITE, C.F_COMMIT)]
    assert [p.digest for p in m.parts] == ["BEGIN", "UPDATE t SET a = ?", "SELECT ?", "COMMIT"]
    assert c.classify("SELECT 1").parts == ()


def test_digest_normalisation():
    c = Classifier()
    d = c.classify("SELECT  a,\n b FROM t WHERE id = 42 AND name = 'x''y' AND z IN (1, 2, 3) -- c").digest
    assert d == "SELECT a, b FROM t WHERE id = ? AND name = ? AND z IN (?)"
    assert c.classify("/* RWPROXY:Replica */ SELECT 1").digest == "/* rwproxy:replica */ SELECT ?"
    assert c.classify("SELECT 1 /*!50000 FOR UPDATE */").digest == "SELECT ? FOR UPDATE"
    assert c.classify("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')").digest == "INSERT INTO t VALUES (?)"
    assert c.classify("SELECT * FROM sbtest1 WHERE x1 = 0x1F").digest == "SELECT * FROM sbtest1 WHERE x1 = ?"


def test_hint_and_plain_statements_are_distinct_entries():
    c = Classifier()
    assert c.classify("SELECT a FROM t").flags == 0
    assert c.classify("/* rwproxy:primary */ SELECT a FROM t").flags == C.F_HINT_PRIMARY
    assert c.classify("SELECT a FROM t").flags == 0
    assert c.classify("/* any other comment */ SELECT a FROM t").flags == 0


def test_readonly_functions():
    plain = Classifier()
    assert plain.classify("SELECT my_ro(1)").route == WRITE
    ro = Classifier(readonly_functions=["MY_RO", "`db2`.`ro_qualified`"])
    assert ro.classify("SELECT my_ro(1)").route == READ
    assert ro.classify("SELECT db2.ro_qualified(1)").route == READ
    assert ro.classify("SELECT db3.other(1)").route == WRITE
    # the deny lists win over the configuration
    assert Classifier(readonly_functions=["get_lock"]).classify("SELECT GET_LOCK('a', 1)").route == WRITE


@pytest.mark.parametrize("sql,stored", [
    ("INSERT INTO sbtest1 (k, c, pad) VALUES (1, 'a', 'b')", False),  # a column list is no call
    ("INSERT IGNORE INTO `my t` (a) VALUES (1)", False),
    ("INSERT LOW_PRIORITY db.t(a) SELECT x FROM u WHERE y IN (1, 2)", False),
    ("REPLACE t (a) VALUES (NOW())", False),
    ("INSERT INTO t PARTITION (p0) (a) VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a)", False),
    ("UPDATE t SET c = CONCAT(c, 'x') WHERE id = 1", False),
    ("DELETE t1 FROM t1 JOIN t2 ON t1.a = t2.a WHERE t2.b = 1", False),
    ("INSERT INTO t (a) VALUES (my_counter())", True),
    ("INSERT INTO db.t (a) VALUES (db.f(1))", True),
    ("INSERT INTO `t`(a) VALUES (`f`(1))", True),
    ("INSERT INTO t (a) VALUES (db.`f`(1))", True),  # a qualified, quoted name is a call too
    ("UPDATE t SET a = 1 WHERE id = next_id()", True),
    ("DELETE FROM t WHERE id = lookup(3)", True),
    ("REPLACE INTO t SELECT f(x) FROM u", True),
])
def test_dml_calling_an_unknown_function_never_shares(sql, stored):
    """A stored function may set user variables or create a temporary table wherever it runs:
    F_STORED_CALL keeps its DML off the connections sessions share (test_multiplex)."""
    c = Classifier()
    r = c.classify(sql)
    assert r.route == WRITE and bool(r.flags & F_STORED_CALL) is stored, flag_names(r.flags)
    assert c.classify(sql).flags == r.flags  # the cached path agrees
    if stored:  # declared read-only: free of side effects, may share
        assert not Classifier(readonly_functions=["my_counter", "db.f", "f", "next_id", "lookup"]
                              ).classify(sql).flags & F_STORED_CALL


def _variants(sql: str) -> list[str]:
    """The statement with other literals (numbers and simple strings)."""
    rnd = random.Random(sql)
    out = []
    for _ in range(3):
        v = re.sub(r"[xXbB]?'[^']*'|(?<![\w@.$])\d+(?![\w$])",
                   lambda m: m.group() if m.group()[0] in "xXbB'" else str(rnd.randint(0, 99999)), sql)
        v = re.sub(r"(?<![\w])'[a-z]*'",
                   lambda m: "'" + "".join(rnd.choice("xyzw") for _ in range(rnd.randint(0, 6))) + "'", v)
        out.append(v)
    return out


def test_cached_path_equals_full_path_on_corpus():
    """The digest cache never answers differently from the full path: warm the cache with each
    corpus statement, then classify literal variants through it."""
    c = Classifier(readonly_functions=RO_FUNCS)
    for sql, _, _ in CORPUS:
        c.classify(sql)
    for sql, _, _ in CORPUS + [(v, 0, "") for v in TRAPS.values() for v in [v[0]]]:
        for v in [sql] + _variants(sql):
            assert c.classify(v) == c.full_classify(v), v


def test_fast_path_equals_full_path():
    c = Classifier()
    assert len(c._exact) >= 30
    for raw, cached in c._exact.items():
        assert cached == c.full_classify(raw) == c.classify(raw), raw
    assert c.classify(b"BEGIN") is c._exact[b"BEGIN"]
    assert c.fast_hits >= 1


def test_lru_bound_and_eviction():
    c = Classifier(cache_size=5)
    stmts = [f"SELECT a{i} FROM t WHERE id = 1" for i in range(20)]
    for s in stmts:
        c.classify(s)
        assert len(c._cache) <= 5
    info = c.cache_info()
    assert info["size"] == 5 and info["maxsize"] == 5 and info["misses"] == 20
    c.classify(stmts[15])  # touch: becomes most recent
    c.classify("SELECT b FROM t")  # evicts the least recent (stmts[16])
    hits = c.hits
    c.classify(stmts[15].replace(" = 1", " = 7"))
    assert c.hits == hits + 1
    c.classify(stmts[16])
    assert c.hits == hits + 1  # it was evicted
    assert len(c._cache) == 5


def test_stats_and_hits_with_varying_literals():
    c = Classifier()
    for i in range(200):
        c.classify(f"SELECT c FROM sbtest1 WHERE id={i}")
        c.classify(f"UPDATE sbtest1 SET k=k+1 WHERE id={i}")
    info = c.cache_info()
    assert info["misses"] == 2 and info["hits"] == 398 and info["parses"] == 1
    assert 0.99 < info["hit_ratio"] <= 1.0


GARBAGE = [
    b"", b" ", b"\x00", b"\xff\xfe\xfd", b"SELECT \xff\xfe FROM t", b"\x80" * 100,
    b"((((((((((", b"))))", b"'", b'"', b"`", b"/*", b"*/", b"--", b"#", b"@", b"@@", b";",
    b"SELECT " + b"(" * 5000 + b"1" + b")" * 5000,
    b"SELECT " + b"-" * 3000 + b"1",
    b"SELECT 1 " + b"UNION SELECT 1 " * 2000,
    "SELECT '\udcff'".encode("utf-8", "surrogateescape"),
]


@pytest.mark.parametrize("raw", GARBAGE, ids=[repr(g[:20]) for g in GARBAGE])
def test_garbage_never_raises(raw):
    c = Classifier()
    got = c.classify(raw)
    assert isinstance(got, Classification)
    if raw.strip() in (b"", b";", b"--", b"#", b"/*", b"*/", b"'", b'"', b"`", b"@", b"@@", b"\x00"):
        assert got.route == WRITE and got.flags & C.F_UNPARSED


def test_random_bytes_never_raise():
    rnd = random.Random(4)
    c = Classifier(cache_size=100)
    alphabet = b"SELECT FROM WHERE '\"`/*-#;@()?,.0123456789 \n\xff"
    for _ in range(500):
        raw = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        got = c.classify(raw)
        assert got.route in (READ, WRITE, SESSION)
        if got.route == READ:  # a read must at least start like one
            assert re.match(rb"\s*(\(|SELECT|TABLE|/\*)", raw, re.I), raw


def test_non_utf8_string_literal_is_a_normal_read():
    c = Classifier()
    got = c.classify(b"SELECT * FROM t WHERE name = '\xe9t\xe9'")
    assert got.route == READ and got.flags == 0


def test_huge_statements_are_cheap_and_conservative():
    c = Classifier()
    rows = b",".join(b"(%d, 'a;b@c', 'x''y')" % i for i in range(30000))
    big_insert = b"INSERT INTO t VALUES " + rows
    assert len(big_insert) > 512 * 1024
    cases = [
        (big_insert, C.F_OVERSIZED),
        (big_insert + b";", C.F_OVERSIZED),
        (big_insert + b"; SELECT 1", C.F_OVERSIZED | C.F_MULTI | C.F_UNPARSED),
        (b"INSERT INTO t VALUES (@x" + b" " * 40000 + b")", C.F_OVERSIZED | C.F_UNPARSED | C.F_CONN_STATE),
        # a big user variable is not replayed: the session keeps the connection that has it
        (b"SET @doc = '" + b"a" * 40000 + b"'", C.F_OVERSIZED | C.F_UNPARSED | C.F_CONN_STATE),
        (b"CALL p('" + b"a" * 40000 + b"')", C.F_OVERSIZED | C.F_UNPARSED | C.F_CONN_STATE),
        (b"SELECT '" + b"a" * (1 << 20) + b"'", C.F_OVERSIZED | C.F_UNPARSED),
        (b"x" * (1 << 20), C.F_OVERSIZED | C.F_UNPARSED),
        (b"INSERT INTO t VALUES ('unterminated" + b" " * 40000, C.F_OVERSIZED | C.F_UNPARSED),
        (b"/*!40000 SELECT 1 FOR UPDATE */ INSERT" + b" " * 40000, C.F_OVERSIZED | C.F_UNPARSED),
        (b"/* rwproxy:primary */ LOAD DATA INFILE 'x' INTO TABLE t" + b" " * 40000,
         C.F_OVERSIZED | C.F_LOAD_DATA | C.F_HINT_PRIMARY),
    ]
    for raw, flags in cases:
        got = c.classify(raw)
        assert (got.route, flag_names(got.flags)) == (WRITE, flag_names(flags)), raw[:40]
        assert got == c.full_classify(raw)
    # what bounds their cost: the cheap C-level scan only, never the Python lexer or sqlglot
    assert c.cache_info()["size"] == 0 and c.parses == 0


def test_big_batch_insert_below_scan_limit_skips_the_lexer():
    c = Classifier()
    raw = ("INSERT INTO t (a, b, c) VALUES " + ",".join(f"({i}, 'n{i}', NOW())" for i in range(300))).encode()
    assert C.BIG_WRITE_BYTES < len(raw) < C.MAX_SCAN_BYTES
    got = c.classify(raw)
    assert got.route == WRITE and got.flags == C.F_OVERSIZED
    assert c.parses == 0 and c.cache_info()["size"] == 0


def test_long_select_over_parse_limit_goes_to_primary():
    c = Classifier(max_parse_chars=2000)
    cond = " OR ".join(f"(a{i} = b{i})" for i in range(300))
    got = c.classify(f"SELECT * FROM t WHERE {cond}")
    assert got.route == WRITE and got.flags & C.F_UNPARSED
    # literal IN-lists are cut before the limit is applied
    ids = ",".join(str(i) for i in range(2000))
    assert c.classify(f"SELECT * FROM t WHERE id IN ({ids})").route == READ


def test_str_and_bytes_agree():
    c = Classifier()
    for sql, _, _ in CORPUS[:50]:
        assert c.classify(sql) == c.classify(sql.encode()) == c.classify(bytearray(sql.encode()))


def test_whole_corpus_classifies_through_the_cache_as_through_the_full_path():
    """(Its speed is benchmarks/classify_micro.py's business, not a test's.)"""
    c = Classifier(readonly_functions=RO_FUNCS)
    for sql, _, _ in CORPUS:
        assert c.classify(sql) == c.full_classify(sql)


_PURE_SCRIPT = r"""
import importlib.abc, importlib.machinery, importlib.util, json, os, sys

class PurePython(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sqlglot" and not name.startswith("sqlglot."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not (spec.origin or "").endswith(".so"):
            return spec
        py = os.path.join(os.path.dirname(spec.origin), name.rsplit(".", 1)[-1] + ".py")
        return importlib.util.spec_from_file_location(name, py)

sys.meta_path.insert(0, PurePython())
import sqlglot.tokens
from proxy.routing.classify import Classifier
c = Classifier(readonly_functions=json.loads(sys.argv[1]))
stmts = json.loads(sys.stdin.read())
print(json.dumps([sqlglot.tokens.SQLGLOTC_INSTALLED] + [[x.route, x.flags] for x in map(c.classify, stmts)]))
"""


def test_same_results_without_sqlglotc():
    """Deployments without the compiled sqlglot must route exactly the same."""
    stmts = [sql for sql, _, _ in CORPUS] + [v[0] for v in TRAPS.values()]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    res = subprocess.run([sys.executable, "-c", _PURE_SCRIPT, json.dumps(RO_FUNCS)], cwd=root,
                         input=json.dumps(stmts), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got[0] is False  # really pure Python
    c = Classifier(readonly_functions=RO_FUNCS)
    assert got[1:] == [[x.route, x.flags] for x in map(c.classify, stmts)]

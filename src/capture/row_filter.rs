//! `track(..., filter => ...)`: a boolean SQL expression over a tracked
//! table's row that says which changes are captured. A change is captured
//! when it holds for the old row or the new row, so that a row leaving the
//! filter is still delivered once more.
//!
//! Postgres evaluates it, in the WHEN clause of one row trigger per event
//! (an INSERT trigger can't name OLD, nor a DELETE trigger NEW): a row it
//! rejects costs no trigger call at all. The text given is never pasted
//! into SQL. It is parsed and analysed as the only output column of
//! `SELECT ... FROM ONLY <table>`, the resulting query must be exactly that,
//! and what goes into the triggers is the expression as Postgres prints it
//! back, with every column qualified by NEW or OLD.

use crate::pg::errors::raise;
use pgrx::prelude::*;
use pgrx::PgList;
use std::ffi::{CStr, CString};

/// Who evaluates a filter, which decides what it may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvaluatedBy {
    /// The role changing a row, in a trigger's WHEN: any function that is
    /// not volatile, as in any WHEN clause.
    TheWriter,
    /// The table's owner, reading for a backfill someone else started:
    /// only built-in immutable functions and operators, as in a logical
    /// replication row filter. The starter's own code, run with the
    /// owner's rights, would make it the owner; a stable built-in such as
    /// query_to_xml() runs SQL text.
    TheOwner,
}

/// A checked filter, printed for the WHEN clauses of the row triggers and
/// for a backfill's scan.
pub struct RowFilter {
    /// Over the table's row, columns unqualified.
    pub plain: String,
    /// Over the new row (`new.<column>`).
    pub new: String,
    /// Over the old row (`old.<column>`).
    pub old: String,
    /// The columns it reads: a change of them is a change to `track`,
    /// whatever its `columns` say.
    pub columns: Vec<String>,
}

fn invalid(message: String) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        Some("A filter is one boolean expression over the table's columns, e.g. filter => 'status <> ''draft'''."),
    )
}

fn unsupported(what: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("a filter can't hold {what}"),
        Some("A filter is evaluated for each changed row, on that row alone: use its columns, operators and functions that are not volatile."),
    )
}

/// Parses and checks `filter` over the rows of table `tbl`, which
/// `table` names as regclass prints it. Raises 22023 for anything but one
/// expression, 0A000 for a subquery, an aggregate, a window function or a
/// set-returning function, 42804 for a type other than boolean and 42P17
/// for a volatile function; a syntax error or an unknown column as Postgres
/// reports them.
pub fn analyze(tbl: pg_sys::Oid, table: &str, filter: &str, by: EvaluatedBy) -> RowFilter {
    let Ok(sql) = CString::new(format!("SELECT {filter}\nFROM ONLY {table}")) else {
        invalid("a filter must not contain a NUL byte".into())
    };
    // SAFETY: parsing and analysing a statement, as any query does, in the
    // caller's transaction; nothing runs. Every pointer read comes from the
    // trees Postgres just built, and list lengths are checked first.
    unsafe {
        let raws = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::pg_parse_query(sql.as_ptr()));
        if raws.len() != 1 {
            invalid("a filter must be one expression".into());
        }
        // Analysing runs code: a literal's cast calls its type's input
        // function, a domain's check with it. For the owner, nothing in it
        // may be anyone's but built in: checked on the raw tree, first.
        if by == EvaluatedBy::TheOwner {
            require_plain(tbl, (*raws.get_ptr(0).expect("one statement")).stmt);
        }
        let q = pg_sys::parse_analyze_fixedparams(raws.get_ptr(0).expect("one statement"), sql.as_ptr(), std::ptr::null(), 0, std::ptr::null_mut());
        let q = &*q;
        if q.hasSubLinks {
            unsupported("a subquery");
        }
        if q.hasAggs {
            unsupported("an aggregate function");
        }
        if q.hasWindowFuncs {
            unsupported("a window function");
        }
        if q.hasTargetSRFs {
            unsupported("a set-returning function");
        }
        let targets = PgList::<pg_sys::TargetEntry>::from_pg(q.targetList);
        let from = PgList::<pg_sys::Node>::from_pg((*q.jointree).fromlist);
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
        let only_the_table = rtable.len() == 1 && {
            let rte = &*rtable.get_ptr(0).expect("one entry");
            rte.rtekind == pg_sys::RTEKind::RTE_RELATION && rte.relid == tbl && !rte.inh
        };
        let one_expression = q.commandType == pg_sys::CmdType::CMD_SELECT
            && q.utilityStmt.is_null()
            && q.cteList.is_null()
            && q.setOperations.is_null()
            && q.groupClause.is_null()
            && q.havingQual.is_null()
            && q.sortClause.is_null()
            && q.distinctClause.is_null()
            && q.windowClause.is_null()
            && q.limitCount.is_null()
            && q.limitOffset.is_null()
            && q.rowMarks.is_null()
            && (*q.jointree).quals.is_null()
            && from.len() == 1
            && only_the_table
            && targets.len() == 1;
        if !one_expression {
            invalid(format!("a filter must be one expression, not {filter:?}"));
        }
        let expr = (*targets.get_ptr(0).expect("one target")).expr.cast::<pg_sys::Node>();
        let typ = pg_sys::exprType(expr);
        if typ != pg_sys::BOOLOID {
            let name = CStr::from_ptr(pg_sys::format_type_be(typ)).to_string_lossy().into_owned();
            raise(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("a filter must be of type boolean, not {name}"),
                Some("Compare the column: filter => 'amount > 0', not filter => 'amount'."),
            );
        }
        if pg_sys::contain_volatile_functions(expr) {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
                "a filter must not call volatile functions",
                Some("Its result must depend on the row alone (and, for a STABLE function, the moment): random() or a function with side effects would capture changes at random."),
            );
        }
        if by == EvaluatedBy::TheOwner && (pg_sys::contain_mutable_functions(expr) || calls_user_code(expr)) {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "a backfill's filter may call only built-in immutable functions and operators",
                Some("The worker evaluates it as the table's owner: compare columns with constants (status <> 'draft', created_at >= '2026-01-01')."),
            );
        }
        // Columns by name: a whole row ("t.*") or a system column is neither
        // a column a trigger compares nor one a backfill's reader prints.
        let mut attnos: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        pg_sys::pull_varattnos(expr, 1, &mut attnos);
        let mut columns = Vec::new();
        let mut member = pg_sys::bms_next_member(attnos, -1);
        while member >= 0 {
            let attno = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
            if attno <= 0 {
                unsupported("a whole row or a system column");
            }
            let name = pg_sys::get_attname(tbl, attno as i16, false);
            columns.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            member = pg_sys::bms_next_member(attnos, member);
        }
        let print = |row: &CStr, prefix: bool| {
            let context = pg_sys::deparse_context_for(row.as_ptr(), tbl);
            CStr::from_ptr(pg_sys::deparse_expression(expr, context, prefix, false)).to_string_lossy().into_owned()
        };
        RowFilter { plain: print(c"row", false), new: print(c"new", true), old: print(c"old", true), columns }
    }
}

/// Whether `node` calls a function that is not built in (an operator's, a
/// cast's or a type's I/O function included) or checks a domain that is
/// not: code someone other than the bootstrap superuser wrote.
///
/// # Safety
/// `node` is an analysed expression tree.
unsafe fn calls_user_code(node: *mut pg_sys::Node) -> bool {
    unsafe extern "C-unwind" fn user_function(func: pg_sys::Oid, _: *mut std::ffi::c_void) -> bool {
        func.to_u32() >= pg_sys::FirstNormalObjectId
    }
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: a node of the tree the caller vouched for; each check only
        // reads it, and the walker visits its children alike.
        unsafe {
            if pg_sys::check_functions_in_node(node, Some(user_function), context) {
                return true;
            }
            if (*node).type_ == pg_sys::NodeTag::T_CoerceToDomain
                && (*node.cast::<pg_sys::CoerceToDomain>()).resulttype.to_u32() >= pg_sys::FirstNormalObjectId
            {
                return true;
            }
            pg_sys::expression_tree_walker(node, Some(walk), context)
        }
    }
    // SAFETY: the caller's contract; the walk keeps no state.
    unsafe { walk(node, std::ptr::null_mut()) }
}

/// What the raw tree of a backfill's filter, `SELECT <filter> FROM ONLY
/// <table>`, may hold before it is analysed: columns of the table whose
/// types are built in (or enums), constants, casts to built-in types,
/// operators and functions named without a schema or with `pg_catalog`,
/// and the plain expression forms around them. Raises 0A000 otherwise.
///
/// # Safety
/// `stmt` is the raw tree Postgres just parsed.
unsafe fn require_plain(tbl: pg_sys::Oid, stmt: *mut pg_sys::Node) {
    // SAFETY: the caller's contract; every node is read by its tag.
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
            invalid("a filter must be one expression".into());
        }
        let targets = PgList::<pg_sys::ResTarget>::from_pg((*stmt.cast::<pg_sys::SelectStmt>()).targetList);
        for target in targets.iter_ptr() {
            let mut context = tbl;
            if raw_walk((*target).val, (&raw mut context).cast()) {
                unsupported("anything but the table's columns of built-in types, constants, casts to built-in types, and built-in operators and functions");
            }
        }
    }
}

/// Whether a name list is one name, or `pg_catalog` and one name.
///
/// # Safety
/// `names` is a raw tree's list of String nodes.
unsafe fn built_in_name(names: *mut pg_sys::List) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        let names = PgList::<pg_sys::Node>::from_pg(names);
        match names.len() {
            1 => true,
            2 => {
                let schema = names.get_ptr(0).expect("a first name");
                (*schema).type_ == pg_sys::NodeTag::T_String
                    && CStr::from_ptr((*schema.cast::<pg_sys::String>()).sval) == c"pg_catalog"
            }
            _ => false,
        }
    }
}

/// The raw tree walker's callback: true (stop) at anything [`require_plain`]
/// refuses. `context` points at the table's oid.
unsafe extern "C-unwind" fn raw_walk(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    use pg_sys::NodeTag::*;
    if node.is_null() {
        return false;
    }
    // SAFETY: a node of the raw tree `require_plain` walks, read by its tag;
    // the context is the oid it passed.
    unsafe {
        let tbl = *context.cast::<pg_sys::Oid>();
        let refused = match (*node).type_ {
            T_List | T_String | T_TypeName | T_A_Const | T_BoolExpr | T_NullTest | T_BooleanTest | T_CaseExpr | T_CaseWhen | T_CoalesceExpr | T_MinMaxExpr
            | T_A_ArrayExpr | T_CollateClause => false,
            T_A_Expr => !built_in_name((*node.cast::<pg_sys::A_Expr>()).name),
            T_FuncCall => !built_in_name((*node.cast::<pg_sys::FuncCall>()).funcname),
            T_TypeCast => {
                let typ = pg_sys::LookupTypeNameOid(std::ptr::null_mut(), (*node.cast::<pg_sys::TypeCast>()).typeName, true);
                typ == pg_sys::InvalidOid || typ.to_u32() >= pg_sys::FirstNormalObjectId
            }
            T_ColumnRef => {
                let fields = PgList::<pg_sys::Node>::from_pg((*node.cast::<pg_sys::ColumnRef>()).fields);
                let name = fields.get_ptr(0).filter(|_| fields.len() == 1).filter(|f| (**f).type_ == T_String);
                match name {
                    None => true,
                    Some(name) => {
                        let attno = pg_sys::get_attnum(tbl, (*name.cast::<pg_sys::String>()).sval);
                        // An unknown column is the analysis's to report.
                        attno > 0 && {
                            let typ = pg_sys::get_atttype(tbl, attno);
                            typ.to_u32() >= pg_sys::FirstNormalObjectId && pg_sys::get_typtype(typ) != pg_sys::TYPTYPE_ENUM as std::ffi::c_char
                        }
                    }
                }
            }
            _ => true,
        };
        refused || pg_sys::raw_expression_tree_walker(node, Some(raw_walk), context)
    }
}

// Parses each file given with Apache Flink's SQL parser (as Flink's SQL client configures it: backtick
// quoting, names as written) and prints `file<TAB>KIND` per statement, or `file<TAB>ERROR<TAB>message`.
// Exit status 0 when every file parsed. Run by tests/support/flink_parser.py.
import java.nio.file.Files;
import java.nio.file.Path;
import org.apache.calcite.avatica.util.Casing;
import org.apache.calcite.avatica.util.Quoting;
import org.apache.calcite.sql.SqlNode;
import org.apache.calcite.sql.parser.SqlParser;
import org.apache.flink.sql.parser.impl.FlinkSqlParserImpl;
import org.apache.flink.sql.parser.validate.FlinkSqlConformance;

public class ParseFlinkSql {
    public static void main(String[] args) throws Exception {
        SqlParser.Config config = SqlParser.config()
            .withParserFactory(FlinkSqlParserImpl.FACTORY)
            .withQuoting(Quoting.BACK_TICK)
            .withUnquotedCasing(Casing.UNCHANGED)
            .withQuotedCasing(Casing.UNCHANGED)
            .withConformance(FlinkSqlConformance.DEFAULT);
        int failed = 0;
        for (String file : args) {
            String sql = Files.readString(Path.of(file));
            try {
                for (SqlNode node : SqlParser.create(sql, config).parseStmtList()) {
                    System.out.println(file + "\t" + node.getKind());
                }
            } catch (Exception e) {
                failed++;
                System.out.println(file + "\tERROR\t" + String.valueOf(e.getMessage()).replace('\n', ' '));
            }
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}

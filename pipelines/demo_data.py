"""A seeded SQLite demo database of a small retail chain, the database of the `demo` source.

Eight related tables with real foreign keys (categories, suppliers, products, stores, employees,
customers, orders, order_items), thousands of rows with believable names, cities, dates, prices and
statuses. The same (n_customers, seed) always gives the same rows, so DVC caching stays meaningful."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from pathlib import Path

from pipelines.common.io import atomic_file

SCHEMA_DDL = """
CREATE TABLE categories (
    category_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL
);
CREATE TABLE suppliers (
    supplier_id INTEGER PRIMARY KEY,
    company_name TEXT NOT NULL,
    contact_name TEXT NOT NULL,
    city TEXT NOT NULL,
    country TEXT NOT NULL,
    phone TEXT NOT NULL
);
CREATE TABLE products (
    product_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    category_id INTEGER NOT NULL REFERENCES categories (category_id),
    supplier_id INTEGER NOT NULL REFERENCES suppliers (supplier_id),
    unit_price REAL NOT NULL,
    units_in_stock INTEGER NOT NULL,
    discontinued INTEGER NOT NULL,
    launch_date DATE NOT NULL
);
CREATE TABLE stores (
    store_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    city TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_on DATE NOT NULL,
    floor_area_sqm INTEGER NOT NULL
);
CREATE TABLE employees (
    employee_id INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    job_title TEXT NOT NULL,
    store_id INTEGER NOT NULL REFERENCES stores (store_id),
    manager_id INTEGER REFERENCES employees (employee_id),
    hire_date DATE NOT NULL,
    salary INTEGER NOT NULL
);
CREATE TABLE customers (
    customer_id INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    city TEXT NOT NULL,
    state TEXT NOT NULL,
    signup_date DATE NOT NULL,
    loyalty_tier TEXT NOT NULL
);
CREATE TABLE orders (
    order_id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
    store_id INTEGER NOT NULL REFERENCES stores (store_id),
    employee_id INTEGER NOT NULL REFERENCES employees (employee_id),
    order_date DATE NOT NULL,
    status TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    shipping_fee REAL NOT NULL
);
CREATE TABLE order_items (
    order_item_id INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders (order_id),
    product_id INTEGER NOT NULL REFERENCES products (product_id),
    quantity INTEGER NOT NULL,
    unit_price REAL NOT NULL,
    discount REAL NOT NULL
);
"""

FIRST_NAMES = (
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard "
    "Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty "
    "Anthony Sandra Mark Margaret Donald Ashley Steven Kimberly Andrew Emily Paul Donna Joshua "
    "Michelle Kenneth Carol Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Ronald "
    "Rebecca Jason Laura Edward Helen Jeffrey Sharon Ryan Cynthia Jacob Kathleen Gary Amy Nicholas "
    "Angela Eric Shirley Jonathan Anna Stephen Ruth Larry Brenda Justin Pamela Scott Nicole Brandon "
    "Katherine Benjamin Samantha Samuel Christine Gregory Emma Alexander Catherine Frank Debra "
    "Raymond Rachel Jack Carolyn Dennis Janet Jerry Maria Tyler Olivia Aaron Heather Jose Diane "
    "Adam Julie Nathan Joyce Henry Victoria Zachary Kelly Douglas Christina Peter Lauren Kyle Joan "
    "Noah Evelyn Ethan Judith Jeremy Megan Walter Andrea Christian Cheryl Keith Hannah Roger Jacqueline "
    "Terry Martha Austin Gloria Sean Teresa Gerald Ann Carl Sara Harold Madison Dylan Frances Arthur "
    "Kathryn Lawrence Janice Jordan Jean Jesse Abigail Bryan Alice Billy Judy Bruce Sophia Gabriel "
    "Grace Joe Denise Logan Amber Alan Doris Juan Marilyn Albert Danielle Willie Beverly Elijah "
    "Isabella Wayne Theresa Randy Diana Vincent Natalie Mason Brittany Roy Charlotte Ralph Marie "
    "Bobby Kayla Russell Alexis Bradley Lori Philip Priya Wei Mateo Aisha Hiroshi Lucia Omar Ingrid"
).split()

LAST_NAMES = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers "
    "Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson "
    "Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders "
    "Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler "
    "Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson Alexander Hamilton "
    "Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera Gibson Ellis Tran Medina "
    "Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez McDonald Woods Washington "
    "Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns Crawford Olson Simpson Porter "
    "Hunter Gordon Mendez Silva Shaw Snyder Mason Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black "
    "Robertson Boyd Rose Stone Salazar Fox Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson"
).split()

# (city, state) pairs of real US cities; stores and customers share them so joins on city make sense.
US_CITIES = (
    ("Seattle", "WA"), ("Spokane", "WA"), ("Tacoma", "WA"), ("Portland", "OR"), ("Eugene", "OR"),
    ("San Francisco", "CA"), ("Los Angeles", "CA"), ("San Diego", "CA"), ("Sacramento", "CA"),
    ("San Jose", "CA"), ("Fresno", "CA"), ("Phoenix", "AZ"), ("Tucson", "AZ"), ("Denver", "CO"),
    ("Boulder", "CO"), ("Salt Lake City", "UT"), ("Las Vegas", "NV"), ("Reno", "NV"),
    ("Albuquerque", "NM"), ("Austin", "TX"), ("Dallas", "TX"), ("Houston", "TX"),
    ("San Antonio", "TX"), ("El Paso", "TX"), ("Oklahoma City", "OK"), ("Tulsa", "OK"),
    ("Kansas City", "MO"), ("St. Louis", "MO"), ("Omaha", "NE"), ("Minneapolis", "MN"),
    ("Saint Paul", "MN"), ("Chicago", "IL"), ("Springfield", "IL"), ("Milwaukee", "WI"),
    ("Madison", "WI"), ("Detroit", "MI"), ("Ann Arbor", "MI"), ("Columbus", "OH"),
    ("Cleveland", "OH"), ("Cincinnati", "OH"), ("Indianapolis", "IN"), ("Louisville", "KY"),
    ("Nashville", "TN"), ("Memphis", "TN"), ("Atlanta", "GA"), ("Savannah", "GA"),
    ("Miami", "FL"), ("Orlando", "FL"), ("Tampa", "FL"), ("Jacksonville", "FL"),
    ("Charlotte", "NC"), ("Raleigh", "NC"), ("Richmond", "VA"), ("Baltimore", "MD"),
    ("Philadelphia", "PA"), ("Pittsburgh", "PA"), ("New York", "NY"), ("Buffalo", "NY"),
    ("Boston", "MA"), ("Providence", "RI"), ("Hartford", "CT"), ("Newark", "NJ"),
    ("Burlington", "VT"), ("Portland", "ME"), ("New Orleans", "LA"), ("Birmingham", "AL"),
)

SUPPLIER_COUNTRIES = (
    ("USA", ("Chicago", "Dallas", "Seattle", "Atlanta")), ("Canada", ("Toronto", "Vancouver", "Montreal")),
    ("Mexico", ("Monterrey", "Guadalajara")), ("Germany", ("Hamburg", "Munich", "Stuttgart")),
    ("Italy", ("Milan", "Bologna")), ("Japan", ("Osaka", "Nagoya")), ("China", ("Shenzhen", "Ningbo")),
    ("Vietnam", ("Ho Chi Minh City", "Hanoi")), ("India", ("Pune", "Chennai")),
    ("Sweden", ("Gothenburg", "Malmo")), ("Brazil", ("Curitiba", "Campinas")),
)

SUPPLIER_WORDS_A = ("North Blue Summit Pacific Atlas Keystone Evergreen Silver Pioneer Harbor Golden "
                    "Cedar Prairie Orbit").split()
SUPPLIER_WORDS_B = ("Trading Supply Goods Imports Manufacturing Wholesale Distributors Industries "
                    "Partners Works").split()

# category -> (description, price range in dollars, product nouns)
CATEGORIES = {
    "Electronics": ("Phones, audio and small gadgets", (15, 900),
                    "Headphones Speaker Smartwatch Tablet Charger Earbuds Camera Router Keyboard "
                    "Monitor".split()),
    "Kitchen": ("Cookware and kitchen appliances", (8, 350),
                "Skillet Blender Kettle Toaster Knife-Set Cutting-Board Mixer Coffee-Maker Saucepan "
                "Colander".split()),
    "Home Decor": ("Lighting, rugs and decorative items", (10, 450),
                   "Lamp Rug Vase Mirror Cushion Curtain Candle Frame Throw-Blanket Clock".split()),
    "Outdoor": ("Camping, garden and patio gear", (12, 600),
                "Tent Backpack Lantern Hammock Cooler Grill Sleeping-Bag Garden-Hose Folding-Chair "
                "Planter".split()),
    "Toys": ("Games and toys for all ages", (5, 120),
             "Puzzle Board-Game Building-Blocks Plush-Bear Kite Yo-Yo Doll Toy-Train Art-Kit Drone".split()),
    "Apparel": ("Clothing and accessories", (9, 220),
                "T-Shirt Jacket Hoodie Scarf Beanie Jeans Raincoat Sneakers Gloves Belt".split()),
    "Grocery": ("Pantry staples and snacks", (2, 40),
                "Coffee-Beans Green-Tea Olive-Oil Pasta Granola Honey Dark-Chocolate Rice Almonds "
                "Maple-Syrup".split()),
    "Beauty": ("Skin care and personal care", (4, 90),
               "Face-Cream Shampoo Conditioner Lip-Balm Sunscreen Body-Lotion Perfume Hand-Soap Serum "
               "Razor".split()),
    "Sports": ("Fitness and sports equipment", (7, 500),
               "Yoga-Mat Dumbbell Tennis-Racket Basketball Soccer-Ball Jump-Rope Bike-Helmet Water-Bottle "
               "Treadmill Kettlebell".split()),
    "Office": ("Stationery and office supplies", (2, 300),
               "Notebook Desk-Chair Stapler Pen-Set Desk-Lamp Binder Whiteboard Planner Paper-Shredder "
               "Backpack".split()),
}
PRODUCT_ADJECTIVES = ("Classic Deluxe Compact Premium Eco Ultra Smart Vintage Pro Everyday Lite Organic "
                      "Heavy-Duty Travel").split()

JOB_TITLES = (("Store Manager", 72000, 95000), ("Assistant Manager", 52000, 68000),
              ("Sales Associate", 31000, 42000), ("Cashier", 28000, 36000),
              ("Stock Clerk", 29000, 37000), ("Visual Merchandiser", 38000, 52000))
LOYALTY_TIERS = (("Bronze", 0.5), ("Silver", 0.3), ("Gold", 0.15), ("Platinum", 0.05))
ORDER_STATUSES = (("delivered", 0.72), ("shipped", 0.1), ("processing", 0.06), ("cancelled", 0.07),
                  ("returned", 0.05))
PAYMENT_METHODS = (("credit card", 0.55), ("debit card", 0.2), ("cash", 0.12), ("gift card", 0.05),
                   ("mobile wallet", 0.08))
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "icloud.com", "proton.me", "fastmail.com")

FIRST_DAY = dt.date(2019, 1, 1)
LAST_DAY = dt.date(2024, 12, 31)


def _weighted(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _date_between(rng: random.Random, start: dt.date, end: dt.date) -> dt.date:
    return start + dt.timedelta(days=rng.randint(0, (end - start).days))


def _insert(conn: sqlite3.Connection, table: str, rows: list[tuple]) -> None:
    placeholders = ", ".join("?" * len(rows[0]))
    conn.executemany(f"INSERT INTO {table} VALUES ({placeholders})", rows)


def _generate_rows(n_customers: int, rng: random.Random) -> dict[str, list[tuple]]:
    """All rows, table by table, in foreign-key order. Sizes scale with n_customers."""
    tables: dict[str, list[tuple]] = {}

    tables["categories"] = [(i, name, desc) for i, (name, (desc, _, _)) in enumerate(CATEGORIES.items(), 1)]

    # Catalogue sizes are capped by the number of distinct names the word lists can make.
    n_suppliers = min(max(6, n_customers // 25), 300)
    suppliers, used_names = [], set()
    while len(suppliers) < n_suppliers:
        name = f"{rng.choice(SUPPLIER_WORDS_A)} {rng.choice(SUPPLIER_WORDS_B)}"
        if name in used_names:
            name = f"{name} {rng.choice(('Ltd', 'Inc', 'Co', 'Group'))}"
        if name in used_names:
            continue
        used_names.add(name)
        country, cities = rng.choice(SUPPLIER_COUNTRIES)
        phone = (f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(100, 999)} "
                 f"{rng.randint(1000, 9999)}")
        suppliers.append((len(suppliers) + 1, name, f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
                          rng.choice(cities), country, phone))
    tables["suppliers"] = suppliers

    products, used_names = [], set()
    n_products = min(max(30, n_customers // 4), 1000)
    category_ids = {name: category_id for category_id, name, _ in tables["categories"]}
    while len(products) < n_products:
        category = rng.choice(list(CATEGORIES))
        _, (low, high), nouns = CATEGORIES[category]
        name = f"{rng.choice(PRODUCT_ADJECTIVES)} {rng.choice(nouns)}".replace("-", " ")
        if name in used_names:
            continue
        used_names.add(name)
        # Prices cluster towards the cheap end of the range, like real catalogues, and end in .99 or .49.
        price = round(low + (high - low) * rng.random() ** 2) + rng.choice((0.99, 0.49))
        products.append((len(products) + 1, name, category_ids[category], rng.randint(1, n_suppliers),
                         price, rng.randint(0, 400), int(rng.random() < 0.08),
                         _date_between(rng, dt.date(2016, 1, 1), dt.date(2024, 6, 30)).isoformat()))
    tables["products"] = products

    n_stores = min(max(4, n_customers // 50), len(US_CITIES))
    store_cities = rng.sample(US_CITIES, n_stores)
    tables["stores"] = [
        (i, f"{city} {rng.choice(('Downtown', 'Mall', 'Central', 'Plaza', 'Outlet'))}", city, state,
         _date_between(rng, dt.date(2005, 1, 1), dt.date(2019, 6, 30)).isoformat(),
         rng.randrange(400, 3000, 10))
        for i, (city, state) in enumerate(store_cities, 1)
    ]

    employees = []
    for store_id, _, _, _, opened_on, _ in tables["stores"]:
        opened = dt.date.fromisoformat(opened_on)
        manager_id = len(employees) + 1
        staff = [JOB_TITLES[0], JOB_TITLES[1]] + rng.choices(JOB_TITLES[2:], k=rng.randint(3, 7))
        for title, low_salary, high_salary in staff:
            employee_id = len(employees) + 1
            employees.append((employee_id, rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), title, store_id,
                              None if employee_id == manager_id else manager_id,
                              _date_between(rng, opened, LAST_DAY - dt.timedelta(days=90)).isoformat(),
                              rng.randrange(low_salary, high_salary, 500)))
    tables["employees"] = employees

    customers, used_emails = [], set()
    for customer_id in range(1, n_customers + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        # Most customers live near a store; some order from elsewhere.
        city, state = rng.choice(store_cities) if rng.random() < 0.7 else rng.choice(US_CITIES)
        email = f"{first.lower()}.{last.lower()}@{rng.choice(EMAIL_DOMAINS)}"
        while email in used_emails:
            email = f"{first.lower()}.{last.lower()}{rng.randint(1, 999)}@{rng.choice(EMAIL_DOMAINS)}"
        used_emails.add(email)
        customers.append((customer_id, first, last, email, city, state,
                          _date_between(rng, FIRST_DAY, LAST_DAY - dt.timedelta(days=30)).isoformat(),
                          _weighted(rng, LOYALTY_TIERS)))
    tables["customers"] = customers

    staff_by_store: dict[int, list[int]] = {}
    for employee in employees:
        staff_by_store.setdefault(employee[4], []).append(employee[0])
    store_by_city = {store[2]: store[0] for store in tables["stores"]}
    orders, order_items = [], []
    for customer in customers:
        signup = dt.date.fromisoformat(customer[6])
        home_store = store_by_city.get(customer[4])
        # Order counts are skewed: many one-time buyers, a few loyal ones; some never ordered at all.
        for _ in range(min(int(rng.expovariate(1 / 4)), 25)):
            store_id = home_store if home_store and rng.random() < 0.8 else rng.randint(1, n_stores)
            order_id = len(orders) + 1
            orders.append((order_id, customer[0], store_id, rng.choice(staff_by_store[store_id]),
                           _date_between(rng, signup, LAST_DAY).isoformat(), _weighted(rng, ORDER_STATUSES),
                           _weighted(rng, PAYMENT_METHODS), rng.choice((0.0, 0.0, 4.99, 7.99, 12.5))))
            for product in rng.sample(products, rng.randint(1, 5)):
                quantity = rng.choice((1, 1, 1, 2, 2, 3, 4, 6))
                discount = rng.choice((0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2))
                order_items.append((len(order_items) + 1, order_id, product[0], quantity, product[4],
                                    discount))
    tables["orders"] = orders
    tables["order_items"] = order_items
    return tables


def build_demo_database(path: Path, n_customers: int, seed: int) -> None:
    """Write the demo retail database to `path` (SQLite), replacing it atomically."""
    rng = random.Random(seed)
    tables = _generate_rows(n_customers, rng)
    with atomic_file(path) as tmp:
        conn = sqlite3.connect(tmp)
        try:
            # Enforced while inserting, so a generator bug cannot leave a dangling reference.
            conn.execute("PRAGMA foreign_keys = ON")
            conn.executescript(SCHEMA_DDL)
            for table, rows in tables.items():
                _insert(conn, table, rows)
            conn.commit()
        finally:
            conn.close()
        tmp.chmod(0o644)  # mkstemp creates owner-only files; the database is a shared, readable artifact
